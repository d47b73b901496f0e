(define (problem plan_trial_T20260101_000001_000001)
    (:domain alfred)
    (:objects
        agent1 - agent
        BookType - otype
        CellPhoneType - otype
        MugType - otype
        PencilType - otype
        BedType - rtype
        DeskType - rtype
        DrawerType - rtype
        GarbageCanType - rtype
        ShelfType - rtype
        Bed_bar__minus_01_dot_50_bar_00_dot_00_bar__plus_01_dot_20 - receptacle
        Desk_bar__plus_01_dot_80_bar_00_dot_00_bar__minus_01_dot_90 - receptacle
        Drawer_bar__plus_01_dot_70_bar__plus_00_dot_30_bar__minus_01_dot_60 - receptacle
        GarbageCan_bar__minus_02_dot_00_bar_00_dot_00_bar__minus_02_dot_10 - receptacle
        Shelf_bar__plus_00_dot_40_bar__plus_01_dot_10_bar__plus_02_dot_30 - receptacle
        Mug_bar__plus_00_dot_35_bar__plus_01_dot_12_bar__plus_02_dot_25 - object
        Pencil_bar__plus_01_dot_75_bar__plus_00_dot_76_bar__minus_01_dot_85 - object
        Book_bar__minus_01_dot_40_bar__plus_00_dot_55_bar__plus_01_dot_10 - object
        CellPhone_bar__plus_01_dot_68_bar__plus_00_dot_32_bar__minus_01_dot_58 - object
        loc_bar_1_bar_1_bar_0_bar_30 - location
        loc_bar__minus_4_bar_4_bar_3_bar_45 - location
        loc_bar_6_bar__minus_5_bar_1_bar_45 - location
        loc_bar_5_bar__minus_4_bar_1_bar_60 - location
        loc_bar__minus_7_bar__minus_6_bar_2_bar_60 - location
        loc_bar_1_bar_7_bar_0_bar_30 - location
        )
    (:init
        (= (total-cost) 0)
        (atLocation agent1 loc_bar_1_bar_1_bar_0_bar_30)
        (receptacleType Bed_bar__minus_01_dot_50_bar_00_dot_00_bar__plus_01_dot_20 BedType)
        (receptacleAtLocation Bed_bar__minus_01_dot_50_bar_00_dot_00_bar__plus_01_dot_20 loc_bar__minus_4_bar_4_bar_3_bar_45)
        (receptacleType Desk_bar__plus_01_dot_80_bar_00_dot_00_bar__minus_01_dot_90 DeskType)
        (receptacleAtLocation Desk_bar__plus_01_dot_80_bar_00_dot_00_bar__minus_01_dot_90 loc_bar_6_bar__minus_5_bar_1_bar_45)
        (receptacleType Drawer_bar__plus_01_dot_70_bar__plus_00_dot_30_bar__minus_01_dot_60 DrawerType)
        (receptacleAtLocation Drawer_bar__plus_01_dot_70_bar__plus_00_dot_30_bar__minus_01_dot_60 loc_bar_5_bar__minus_4_bar_1_bar_60)
        (openable Drawer_bar__plus_01_dot_70_bar__plus_00_dot_30_bar__minus_01_dot_60)
        (receptacleType GarbageCan_bar__minus_02_dot_00_bar_00_dot_00_bar__minus_02_dot_10 GarbageCanType)
        (receptacleAtLocation GarbageCan_bar__minus_02_dot_00_bar_00_dot_00_bar__minus_02_dot_10 loc_bar__minus_7_bar__minus_6_bar_2_bar_60)
        (receptacleType Shelf_bar__plus_00_dot_40_bar__plus_01_dot_10_bar__plus_02_dot_30 ShelfType)
        (receptacleAtLocation Shelf_bar__plus_00_dot_40_bar__plus_01_dot_10_bar__plus_02_dot_30 loc_bar_1_bar_7_bar_0_bar_30)
        (objectType Mug_bar__plus_00_dot_35_bar__plus_01_dot_12_bar__plus_02_dot_25 MugType)
        (inReceptacle Mug_bar__plus_00_dot_35_bar__plus_01_dot_12_bar__plus_02_dot_25 Shelf_bar__plus_00_dot_40_bar__plus_01_dot_10_bar__plus_02_dot_30)
        (objectAtLocation Mug_bar__plus_00_dot_35_bar__plus_01_dot_12_bar__plus_02_dot_25 loc_bar_1_bar_7_bar_0_bar_30)
        (pickupable Mug_bar__plus_00_dot_35_bar__plus_01_dot_12_bar__plus_02_dot_25)
        (moveable Mug_bar__plus_00_dot_35_bar__plus_01_dot_12_bar__plus_02_dot_25)
        (objectType Pencil_bar__plus_01_dot_75_bar__plus_00_dot_76_bar__minus_01_dot_85 PencilType)
        (inReceptacle Pencil_bar__plus_01_dot_75_bar__plus_00_dot_76_bar__minus_01_dot_85 Desk_bar__plus_01_dot_80_bar_00_dot_00_bar__minus_01_dot_90)
        (objectAtLocation Pencil_bar__plus_01_dot_75_bar__plus_00_dot_76_bar__minus_01_dot_85 loc_bar_6_bar__minus_5_bar_1_bar_45)
        (pickupable Pencil_bar__plus_01_dot_75_bar__plus_00_dot_76_bar__minus_01_dot_85)
        (moveable Pencil_bar__plus_01_dot_75_bar__plus_00_dot_76_bar__minus_01_dot_85)
        (objectType Book_bar__minus_01_dot_40_bar__plus_00_dot_55_bar__plus_01_dot_10 BookType)
        (inReceptacle Book_bar__minus_01_dot_40_bar__plus_00_dot_55_bar__plus_01_dot_10 Bed_bar__minus_01_dot_50_bar_00_dot_00_bar__plus_01_dot_20)
        (objectAtLocation Book_bar__minus_01_dot_40_bar__plus_00_dot_55_bar__plus_01_dot_10 loc_bar__minus_4_bar_4_bar_3_bar_45)
        (pickupable Book_bar__minus_01_dot_40_bar__plus_00_dot_55_bar__plus_01_dot_10)
        (moveable Book_bar__minus_01_dot_40_bar__plus_00_dot_55_bar__plus_01_dot_10)
        (objectType CellPhone_bar__plus_01_dot_68_bar__plus_00_dot_32_bar__minus_01_dot_58 CellPhoneType)
        (inReceptacle CellPhone_bar__plus_01_dot_68_bar__plus_00_dot_32_bar__minus_01_dot_58 Drawer_bar__plus_01_dot_70_bar__plus_00_dot_30_bar__minus_01_dot_60)
        (objectAtLocation CellPhone_bar__plus_01_dot_68_bar__plus_00_dot_32_bar__minus_01_dot_58 loc_bar_5_bar__minus_4_bar_1_bar_60)
        (pickupable CellPhone_bar__plus_01_dot_68_bar__plus_00_dot_32_bar__minus_01_dot_58)
        (moveable CellPhone_bar__plus_01_dot_68_bar__plus_00_dot_32_bar__minus_01_dot_58)
        (canContain DeskType MugType)
        (canContain DeskType PencilType)
        (canContain DeskType BookType)
        (canContain DeskType CellPhoneType)
        (canContain ShelfType MugType)
        (canContain ShelfType PencilType)
        (canContain ShelfType BookType)
        (canContain ShelfType CellPhoneType)
        (canContain DrawerType PencilType)
        (canContain DrawerType BookType)
        (canContain DrawerType CellPhoneType)
        (canContain BedType BookType)
        (canContain BedType CellPhoneType)
        (canContain GarbageCanType PencilType)
        (canContain GarbageCanType MugType)
        )

    (:goal
        (and
            (exists (?o - object ?r - receptacle)
                (and
                    (objectType ?o MugType)
                    (receptacleType ?r DeskType)
                    (inReceptacle ?o ?r)
                )
            )
        )
    )
)
